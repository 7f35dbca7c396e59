// Sends identify, group, track and page calls with Segment's official Node
// client (@segment/analytics-node), pointed at a Sluice server.
// Usage: node segment_node.mjs URL WRITE_KEY
import { Analytics } from '@segment/analytics-node'

const [url, writeKey] = process.argv.slice(2)
const errors = []
const analytics = new Analytics({ writeKey, host: url, path: '/v1/batch', flushAt: 10, maxRetries: 0 })
analytics.on('error', (err) => errors.push(err))

analytics.identify({ userId: 'node-user', traits: { email: 'node@example.com' }, messageId: 'node-identify-1' })
analytics.group({ userId: 'node-user', groupId: 'node-acme', traits: { name: 'Acme (Node)' }, messageId: 'node-group-1' })
analytics.track({
  userId: 'node-user',
  event: 'Item Purchased',
  properties: { sku: 'A-1', price: 3 },
  timestamp: new Date(Date.now() - 5 * 60 * 1000),
  messageId: 'node-track-1',
})
analytics.page({ userId: 'node-user', name: 'Pricing', properties: { path: '/pricing' }, messageId: 'node-page-1' })
await analytics.closeAndFlush({ timeout: 20000 })
if (errors.length) {
  console.error('client errors:', errors)
  process.exit(1)
}
console.log('ok')
