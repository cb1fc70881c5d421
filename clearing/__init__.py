"""clearing"""
