"""slotpack.converters: turning a manifest plus arrays into other formats (ONNX first), without torch."""
