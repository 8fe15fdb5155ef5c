"""Training: the engine (Algorithm 1 for any task and method), the detection and classification task adapters, backbone transfer."""
