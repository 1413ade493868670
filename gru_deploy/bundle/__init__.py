"""Edge and server bundles: packaging, int8 quantisation, reading and verifying bundles, inspect."""
