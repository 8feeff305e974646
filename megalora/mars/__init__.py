"""MARS: multimodal adaptive rank search by dual scaling laws (``megalora rank-search``)."""
