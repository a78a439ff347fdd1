"""What EHRs and FHIR servers send medagent: subscription notifications, parsed into typed results."""
