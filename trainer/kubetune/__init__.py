"""kubetune: hyperparameter tuning that runs the same TuningJob locally and on Kubernetes."""
__version__ = "0.1.0"
