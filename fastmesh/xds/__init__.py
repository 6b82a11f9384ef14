"""xDS v3: fastmesh driven by a control plane (Istio's istiod, go-control-plane, ...).

- ``resources``: xDS resources as plain data, composed with the bootstrap's static ones into
  the document the Envoy translator (``fastmesh.config.envoy``) reads;
- ``ads``: the aggregated discovery stream (state of the world), ACK/NACK, reconnects;
- ``source``: the supervisor's side: apply what the stream sends through the one config path.
"""
