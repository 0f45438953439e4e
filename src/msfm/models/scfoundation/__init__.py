"""scFoundation (xTrimoGene) family: config, model, presets and the official-checkpoint converter."""
