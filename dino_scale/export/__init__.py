"""Export for serving: `python -m dino_scale.export onnx --config C --checkpoint CKPT --out model.onnx`
(docs/export.md). `graph` builds and writes the ONNX graph, `runtime` runs it with ONNX Runtime."""
