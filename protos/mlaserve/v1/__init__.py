"""mlaserve.v1: decoder.proto and its generated code (regenerate: python -m mlaserve.protos.generate)."""
