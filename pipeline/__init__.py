"""poisongate: DVC stages whose release gates stop poisoned data and backdoored models."""
