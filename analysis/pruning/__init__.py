"""The PruningPlan contract (validated JSON) and applying a plan to a loaded model. Imports core and model."""
