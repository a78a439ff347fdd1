"""Similar-case search over MedSigLIP image embeddings: an embedded index folder or pgvector.

Where it sits: :mod:`agent.retrieval.ingest` turns DICOM sources into entries and embeddings,
an :class:`~agent.retrieval.protocols.ImageIndex` stores them, and search returns the studies
whose images are closest to a query image or text (``medagent index ...``, and the agent's
similar-case step). Heavy modules (numpy kernels, SQL, torch) are imported by the submodules
that need them, never here.
"""
