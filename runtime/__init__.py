"""slotpack.runtime: the torch-free side of slotpack (numpy only; torch is never imported here).

Rebuilding dense weights from a ``.slot`` file and running models in onnxruntime land here with
the format and ONNX issues; the generator's numpy half they use is ``slotpack.prng``.
"""
