"""terminal_agent"""
