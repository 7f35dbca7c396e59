#!/bin/bash
# Server memory during a large usage import: starts `sluice serve` on a temp
# data dir (port 18680), creates an Asia/Tokyo workspace and a sum meter,
# uploads CSV_FILE, polls the import, samples the server RSS every 250 ms and
# prints the peak, the time to done and to consumers caught up, and the total.
#   python3 tests/bench/gen_usage_csv.py 23500000 /tmp/usage1g.csv   # 1.07 GB
#   tests/bench/import_rss.sh target/release/sluice /tmp/usage1g.csv
BIN=${1:?usage: import_rss.sh SLUICE_BINARY CSV_FILE}; CSV=${2:?usage: import_rss.sh SLUICE_BINARY CSV_FILE}
D=$(mktemp -d); PORT=18680
export SLUICE_BOOTSTRAP_KEY=sk_benchrootkey0123456789abcdef
$BIN serve --data-dir $D --listen 127.0.0.1:$PORT > $D/server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:$PORT/healthz >/dev/null && break; sleep 0.2; done
K=$SLUICE_BOOTSTRAP_KEY
curl -s localhost:$PORT/v1/workspaces -H "Authorization: Bearer $K" -d '{"name":"big","time_zone":"Asia/Tokyo"}' >/dev/null
AK=$(curl -s localhost:$PORT/v1/keys -H "Authorization: Bearer $K" -d '{"name":"b","scope":"admin","workspace":"big"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["secret"])')
curl -s localhost:$PORT/v1/meters -H "Authorization: Bearer $AK" -d '{"key":"gb","event_type":"storage.used","aggregation":"sum","value_property":"gb"}' >/dev/null
(maxr=0; while kill -0 $SP 2>/dev/null; do r=$(ps -o rss= -p $SP); [ -n "$r" ] && [ $r -gt $maxr ] && maxr=$r && echo $maxr > $D/maxrss; sleep 0.25; done) &
T0=$(date +%s.%N)
ID=$(curl -s localhost:$PORT/v1/imports?kind=usage -H "Authorization: Bearer $AK" -H 'Content-Type: text/csv' --data-binary @$CSV | python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
echo "uploaded $(echo "$(date +%s.%N) - $T0" | bc) s id=$ID rss=$(cat $D/maxrss)"
while true; do
  S=$(curl -s localhost:$PORT/v1/imports/$ID -H "Authorization: Bearer $AK")
  st=$(echo "$S" | python3 -c 'import json,sys;d=json.load(sys.stdin);print(d["status"], d.get("rows_processed"), d.get("rows_total"))')
  case "$st" in succeeded*|failed*|cancelled*) break;; esac
  sleep 1; echo "$(echo "$(date +%s.%N) - $T0" | bc) $st rss_max_kb=$(cat $D/maxrss) rss_now=$(ps -o rss= -p $SP)"
done
echo "done: $st $(echo "$(date +%s.%N) - $T0" | bc) s"
echo "$S" | head -c 600; echo
while true; do L=$(curl -s localhost:$PORT/v1/consumers -H "Authorization: Bearer $AK" | python3 -c 'import json,sys;d=json.load(sys.stdin)["data"];print(sum(c.get("lag") or 0 for c in d))'); [ "$L" = 0 ] && break; sleep 1; done
echo "consumers caught up $(echo "$(date +%s.%N) - $T0" | bc) s; max RSS kB: $(cat $D/maxrss)"
curl -s "localhost:$PORT/v1/meters/gb/usage?granularity=total" -H "Authorization: Bearer $AK" | python3 -c 'import json,sys,decimal;d=json.load(sys.stdin)["data"];print("total",sum(decimal.Decimal(str(r["value"])) for r in d))'
# The kernel's high-water mark of the resident set (exact; the samples above can miss a short peak).
echo "peak RSS (VmHWM): $(grep VmHWM /proc/$SP/status)"
kill $SP; wait $SP 2>/dev/null
du -sh $D; rm -rf $D
