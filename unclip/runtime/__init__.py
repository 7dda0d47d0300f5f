"""The runtime every service shares: settings, the gRPC server, the tensor codec, error mapping, images."""
