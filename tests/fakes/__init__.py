"""Hand-written fakes shared by the test suite."""
