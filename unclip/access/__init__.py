"""Controlled access: who is calling (API keys, client certificates), what they may do (scopes), what they may
spend (quotas, priority classes) and what they used (usage ledger).

- `keys`: the keys file (YAML or JSON) and the `KeyStore` that reads it and reloads it when it changes.
- `interceptor`: the orchestrator's front door (`authorization: Bearer <key>` or a client certificate ->
  `Identity`) and the stages' caller check (a certificate of the stack's CA, from a service allowed to call).
- `tls`: a local CA and per-service certificates for `unclip up`, and the gRPC credentials built from them.
"""
