# Generates the usage CSV of the memory benchmark: python3 gen_usage_csv.py ROWS OUT.csv
# (1,000 customers, one meter `gb`, March 2024 timestamps, one-decimal quantities).
import sys
rows=int(sys.argv[1]); out=sys.argv[2]
with open(out,'w') as f:
    f.write("customer_id,subscription_id,meter,timestamp,quantity\n")
    buf=[]
    for i in range(rows):
        buf.append(f"cust-{i%1000},sub-{i%1000},gb,2024-03-{i%28+1:02}T{i%24:02}:{i%60:02}:{(i//60)%60:02}Z,{i%97}.{i%10}\n")
        if len(buf)>=100000:
            f.write(''.join(buf)); buf=[]
    f.write(''.join(buf))
