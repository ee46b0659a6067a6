"""Models: ``nn.Module``s that hold the math. They import no Lightning."""
