"""From a PyTorch module to checked graphs: TorchScript with the loop check, the ONNX forms (loop, stepwise, fused) with their guards, ORT format, and the export folder."""
