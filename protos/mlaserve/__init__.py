"""Generated code of protos/mlaserve/ (import root protos/)."""
