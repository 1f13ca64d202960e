"""Authentication: who a connection speaks for, and what it may do.

- `identity`: `Identity`, the verified claims every layer above reads.
- `keys`: JWT verification (`Verifier`), key sets from PEM or JWKS files and
  their rotation (`KeyStore`), `AuthError` with its reasons.
- `permissions`: NATS-style channel patterns with `{sub}`, the `admin` role.
- `devkeys`: the development key pair and token minting (`apix-trio token`).
"""
