"""closedloop.control"""
