"""The kubetune operator: the Kubernetes side of kubetune, run by ``kubetune operator``.

It builds on the trainer side (the spec model, the study, the job core), which never imports it
but for the command line (tests/test_layout.py). The modules: docs/development.md (Layout).
"""
