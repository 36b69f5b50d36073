"""`finqlora ui`: a local web app to compare models, watch runs and rate answers blind."""
