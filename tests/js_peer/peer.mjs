// A standard js-libp2p peer against a rentahal node (tests/test_interop.py): TCP+Noise+Yamux, Kad-DHT findProviders(chat), GossipSub health.
// usage: node peer.mjs /ip4/127.0.0.1/tcp/PORT/p2p/PEERID [gossipSeconds=10] [dhtTimeoutSeconds=30]
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@libp2p/noise'
import { yamux } from '@libp2p/yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { gossipsub } from '@libp2p/gossipsub'
import { CID } from 'multiformats/cid'
import { sha256 } from 'multiformats/hashes/sha2'
import * as raw from 'multiformats/codecs/raw'
import { multiaddr } from '@multiformats/multiaddr'

const out = (o) => console.log(JSON.stringify({ t: Date.now(), ...o }))
const target = process.argv[2]
if (!target) { console.error('usage: node peer.mjs <multiaddr with /p2p/>'); process.exit(2) }
const gossipSecs = Number(process.argv[3] ?? 10)
const dhtSecs = Number(process.argv[4] ?? 30)
const ma = multiaddr(target)
const remoteId = ma.getComponents().findLast(c => c.name === 'p2p')?.value
const TOPIC = 'rentahal/health/1'
const CHAT = CID.parse('bafkreie3so3yl2vgxbsgs6ipzugjv6cx2iekg7oewzaey75xdy66vz3q5u')

// sanity: recompute the key the way PROTOCOLS.md defines it
const recomputed = CID.createV1(raw.code, await sha256.digest(new TextEncoder().encode('/rentahal/realm/chat')))
out({ kind: 'key', cid: CHAT.toString(), recomputed: recomputed.toString(), equal: recomputed.equals(CHAT) })

const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    // kad-dht pings every new DHT contact with /ipfs/ping/1.0.0 before adding it to its routing table;
    // ping's default maxOutboundStreams is 1 per connection, so an app-level ping at the same moment makes
    // that ping fail (TooManyOutboundProtocolStreamsError) and kad-dht drops the peer for good.
    ping: ping({ maxOutboundStreams: 4 }),
    dht: kadDHT({
      protocol: '/ipfs/kad/1.0.0',
      clientMode: true,
      peerInfoMapper: passthroughMapper // keep loopback/private addrs
    }),
    pubsub: gossipsub({
      allowPublishToZeroTopicPeers: true,
      emitSelf: false,
      globalSignaturePolicy: 'StrictSign'
    })
  }
})
await node.start()
out({ kind: 'self', peer: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

let providerOk = false
let remotePeer = null
let healthOk = false
let healthCount = 0

// subscribe first so the SUBSCRIBE goes out with the first pubsub RPC
node.services.pubsub.subscribe(TOPIC)
node.services.pubsub.addEventListener('message', (evt) => {
  const m = evt.detail
  if (m.topic !== TOPIC) return
  const from = m.type === 'signed' ? m.from.toString() : null
  healthCount++
  if (from === remoteId) healthOk = true
  out({ kind: 'health', from, type: m.type, seq: m.sequenceNumber?.toString(), bytes: m.data.length })
})

const t0 = Date.now()
try {
  const conn = await node.dial(ma, { signal: AbortSignal.timeout(10000) })
  remotePeer = conn.remotePeer
  out({ kind: 'connected', remote: conn.remotePeer.toString(), addr: conn.remoteAddr.toString(),
    encryption: conn.encryption, multiplexer: conn.multiplexer, ms: Date.now() - t0 })
  const rtt = await node.services.ping.ping(ma, { signal: AbortSignal.timeout(5000) })
  out({ kind: 'ping', rtt_ms: rtt })
} catch (e) {
  out({ kind: 'error', step: 'dial', name: e.name, message: e.message })
  await node.stop(); process.exit(1)
}

try {
  const p = await node.peerStore.get(remotePeer)
  out({ kind: 'remote-protocols', peer: remoteId, protocols: p.protocols,
    addrs: p.addresses.map(a => a.multiaddr.toString()), agent: new TextDecoder().decode(p.metadata.get('AgentVersion') ?? new Uint8Array()) })
} catch (e) {
  out({ kind: 'error', step: 'peerstore', name: e.name, message: e.message })
}
out({ kind: 'dht-routing-table', size: node.services.dht.routingTable?.size })

// (1) DHT: findProviders, retrying until the deadline (the node provides shortly after its model loads)
const dhtDeadline = Date.now() + dhtSecs * 1000
while (!providerOk && Date.now() < dhtDeadline) {
  try {
    const signal = AbortSignal.timeout(Math.max(1000, Math.min(10000, dhtDeadline - Date.now())))
    for await (const prov of node.contentRouting.findProviders(CHAT, { signal })) {
      const pid = prov.id.toString()
      out({ kind: 'provider', peer: pid, addrs: prov.multiaddrs.map(String), matches: pid === remoteId })
      if (pid === remoteId) { providerOk = true; break }
    }
    if (!providerOk) out({ kind: 'dht', note: 'query finished without the node as provider; retrying' })
  } catch (e) {
    out({ kind: 'error', step: 'findProviders', name: e.name, message: e.message })
  }
  if (!providerOk) await new Promise(r => setTimeout(r, 2000))
}

// (2) gossip: wait up to gossipSecs for a health record from the node (it publishes ~1/s)
const gEnd = Date.now() + gossipSecs * 1000
while (!healthOk && Date.now() < gEnd) {
  await new Promise(r => setTimeout(r, 100))
}
out({ kind: 'gossip-state', topicPeers: node.services.pubsub.getSubscribers(TOPIC).map(String),
  meshPeers: node.services.pubsub.getMeshPeers?.(TOPIC)?.map(String), healthCount })

out({ kind: 'result', provider_found: providerOk, health_received: healthOk, ok: providerOk && healthOk })
await node.stop()
process.exit(providerOk && healthOk ? 0 : 1)
