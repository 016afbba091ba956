"""The Kubeflow layer over tsallis_core: the kfp components (components.py), the cold-start sweep pipeline
(cold_start_sweep.py) and the ``tsallis pipeline`` commands (cli.py). It imports the library; the library never
imports it. The top-level folders components/ and pipelines/ of a checkout re-export it."""
