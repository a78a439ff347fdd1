"""Turn fetched FHIR resources into the compact, dated, cited text the reasoner reads."""
