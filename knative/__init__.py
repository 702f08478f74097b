"""The Knative target: kold functions as Knative Services, driven through the Kubernetes API."""
