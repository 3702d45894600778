"""The cloud over HTTP: `server` (the verifier as a service), `client` (`HttpVerifier`, the decoder's side) and
`wire` (the binary protocol both sides import).

TOKEN_ENV lives here, light to import, because the server, the client and `hlm.session` all read it."""

TOKEN_ENV = "HLM_CLOUD_TOKEN"  # the bearer token both sides share
# Sent by a client on the open that replaces a session it lost (the value says how); the server counts resyncs.
RESYNC_HEADER = "x-hlm-resync"
RESYNC_REASONS = ("lost", "out-of-step", "garbled")
