"""moescope's Streamlit dashboard: pages draw what :mod:`analysis` computes; they never compute."""
