// Runs Python files under MicroPython (the WebAssembly port, pinned by package-lock.json):
//   node run.mjs [--lib FILE]... [--compile FILE]... --run SCRIPT < input.json
// --lib files go to /lib (on sys.path), stdin to /input.json; each --compile file is only
// compiled (MicroPython's grammar: a board's own modules such as `machine` cannot be
// imported here); then SCRIPT runs. Its output is printed; the exit code is 1 when
// MicroPython raised.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const libs = [], checks = [];
let script = null;
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i += 2) {
  const [flag, value] = [args[i], args[i + 1]];
  if (flag === "--lib") libs.push(value);
  else if (flag === "--compile") checks.push(value);
  else if (flag === "--run") script = value;
  else throw new Error(`unknown argument ${flag}`);
}
if (script === null) throw new Error("--run SCRIPT is required");

const out = [];
const mp = await loadMicroPython({
  stdout: (line) => out.push(line),
  stderr: (line) => out.push(line),
});
mp.FS.mkdirTree("/lib");
for (const file of libs) mp.FS.writeFile(`/lib/${basename(file)}`, readFileSync(file));
mp.FS.writeFile("/input.json", readFileSync(0));
mp.FS.mkdir("/check");
let failed = false;
try {
  for (const file of checks) {
    mp.FS.writeFile(`/check/${basename(file)}`, readFileSync(file));
    mp.runPython(`compile(open("/check/${basename(file)}").read(), "${file}", "exec")`);
    out.push(`compiled ${file}`);
  }
  mp.runPython(readFileSync(script, "utf8"));
} catch (err) {
  failed = true;
  out.push(`MicroPython raised: ${err}`);
}
process.stdout.write(out.join("\n") + "\n");
process.exit(failed ? 1 : 0);
