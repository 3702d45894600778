"""The cloud over HTTP: `server` (the verifier as a service), `client` (`HttpVerifier`, the decoder's side) and
`wire` (the binary protocol both sides import)."""
