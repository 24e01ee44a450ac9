// onnxruntime-web's wasm build in Node.js, for tests/test_web.py and the benchmark:
// node ort_node.mjs DIST MODEL INPUT.f32 SHAPE_JSON  ->  one JSON line: logits bits, and the
// session creation times, first (with the wasm backend's start) and again.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [dist, model, input, shape] = process.argv.slice(2);
const ort = await import(pathToFileURL(`${dist}/ort.wasm.min.mjs`).href);
ort.env.wasm.numThreads = 1;
const bytes = readFileSync(model);
let t0 = performance.now();
const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
const createMs = performance.now() - t0; // includes starting the wasm backend
t0 = performance.now();
await (await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] })).release();
const againMs = performance.now() - t0;
const raw = readFileSync(input);
const x = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
const result = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", x, JSON.parse(shape)) });
const logits = result[session.outputNames[0]].data;
const bits = Array.from(new Uint32Array(logits.buffer, logits.byteOffset, logits.length));
console.log(JSON.stringify({ create_ms: createMs, create_again_ms: againMs, logits_bits: bits, node: process.version }));
