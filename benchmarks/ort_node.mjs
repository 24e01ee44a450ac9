// onnxruntime-web's wasm build in Node.js, for tests/test_web.py and the benchmark:
// node ort_node.mjs DIST MODEL INPUT.f32 SHAPE_JSON  ->  one JSON line: logits bits, timing.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [dist, model, input, shape] = process.argv.slice(2);
const ort = await import(pathToFileURL(`${dist}/ort.wasm.min.mjs`).href);
ort.env.wasm.numThreads = 1;
const t0 = performance.now();
const session = await ort.InferenceSession.create(readFileSync(model), { executionProviders: ["wasm"] });
const createMs = performance.now() - t0;
const bytes = readFileSync(input);
const x = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
const result = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", x, JSON.parse(shape)) });
const logits = result[session.outputNames[0]].data;
const bits = Array.from(new Uint32Array(logits.buffer, logits.byteOffset, logits.length));
console.log(JSON.stringify({ create_ms: createMs, logits_bits: bits, node: process.version }));
