"""Systems: LightningModules that orchestrate models, losses, logging and optimizers."""
