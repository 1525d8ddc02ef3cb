"""Data: OCELOT readers and writers, training targets, the synthetic world, augmentation."""
