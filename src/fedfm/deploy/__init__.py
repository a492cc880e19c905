"""Deployment: gRPC serving with TLS and tokens (server.py, client.py), identities and provisioning."""
