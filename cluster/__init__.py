"""Ray Serve app, `ray job submit` batch entrypoint and deployment manifests."""
