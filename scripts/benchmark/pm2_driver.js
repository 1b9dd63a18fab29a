// The benchmark's client of a private pm2 daemon (daemons.Pm2 runs it with
// PM2_HOME set to a temp dir): it connects through pm2's programmatic API once,
// then reads one JSON request a line on stdin and writes one JSON reply a line
// on stdout, so that a request costs a pipe round trip, not node's start-up
// (as supervisord's XML-RPC is called from Python).
//
//   node pm2_driver.js PM2_MODULE_DIR
//
// Requests: {"op": OP, "args": [...]}; replies: {"ok": true, "value": ...} or
// {"ok": false, "error": "..."}. The first reply, unasked, says it connected.
//
//   start APP_OR_NAME  pm2.start() (an app's options, or a stopped app's name)
//   stop NAME          pm2.stop()
//   delete NAME        pm2.delete()
//   pids NAME          the pids of NAME's running processes (pm2.list())
//   repeat N NAME      N pm2.describe(NAME) one after the other: mean us each
//
// On EOF on stdin (the benchmark exited without killing it) it kills the
// daemon, pm2.killDaemon(), and exits.
"use strict";

const readline = require("readline");

console.log = console.error; // pm2 may print: stdout is the protocol's
const pm2 = require(process.argv[2]);

function reply(value, error) {
  const line = error ? { ok: false, error: String(error.stack || error) } : { ok: true, value };
  process.stdout.write(JSON.stringify(line) + "\n");
}

function call(method, ...args) {
  return new Promise((resolve, reject) => {
    pm2[method](...args, (err, value) => (err ? reject(err) : resolve(value)));
  });
}

async function repeat(n, name) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await call("describe", name);
  return Number(process.hrtime.bigint() - t0) / 1000 / n;
}

async function pids(name) {
  const list = await call("list");
  return list.filter((p) => p.name === name && p.pid).map((p) => p.pid);
}

async function kill() {
  await call("killDaemon");
  pm2.disconnect();
  return true;
}

const OPS = {
  start: (app) => call("start", app).then(() => true),
  stop: (name) => call("stop", name).then(() => true),
  delete: (name) => call("delete", name).then(() => true),
  pids,
  repeat,
};

async function serve() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const { op, args } = JSON.parse(line);
    try {
      reply(await OPS[op](...(args || [])));
    } catch (err) {
      reply(null, err);
    }
  }
  await kill().catch(() => {});
  process.exit(0);
}

pm2.connect((err) => {
  if (err) {
    reply(null, err);
    process.exit(1);
  }
  reply("connected");
  serve();
});
