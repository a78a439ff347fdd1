"""Model adapters: MedSigLIP (image findings) and MedGemma (reasoning)."""
