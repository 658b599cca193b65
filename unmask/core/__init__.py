"""The framework's core: configuration and its schemas, building a detector with its
wrappers, the LightningModule, the checkpoint format and the detection metrics."""
