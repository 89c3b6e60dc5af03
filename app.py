"""roma-analytics dashboard (placeholder until the dashboard lands)."""
import streamlit as st

st.set_page_config(page_title="ROMA Connect task analytics", page_icon="📊", layout="wide")
st.title("ROMA Connect task analytics")
st.info("The dashboard is being built; the sample history will appear here.")
