"""The kubetune operator: the Kubernetes side of kubetune, run by ``kubetune operator``.

A kopf operator that turns each TuningJob into worker pods sharing one Optuna study
(``handlers``, ``pod_launcher``), with its settings (``settings``), its entry point (``main``),
the Kubernetes credentials (``client``), the TuningJob CRD generated from the spec model
(``crd``) and ``kubetune results`` (``results``). It builds on the trainer side (``kubetune``:
the spec model, the study, the job core), which never imports it but for the command line.
"""
