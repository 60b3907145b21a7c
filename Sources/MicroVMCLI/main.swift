print("microvm")
