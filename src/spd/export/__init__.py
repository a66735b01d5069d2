"""Export for deployment: SPD as two ONNX graphs (`onnx_export`), and a predictor that runs them on
ONNX Runtime (`runtime.OnnxPredictor`). Needs the optional extra: pip install "spd[export]"."""
