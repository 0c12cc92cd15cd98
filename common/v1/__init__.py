"""Generated gRPC stubs for the spillway.v1 API. Do not edit."""
