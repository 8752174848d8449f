"""Controls with a known answer: a planted multimodal neuron, model and label randomisation."""
