// Node 20 lacks Promise.withResolvers (added in Node 22); current js-libp2p (it-queue, mortice,
// @libp2p/utils, yamux, ping) calls it. Node 20 is EOL-ish; this shim makes the probe run there.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
