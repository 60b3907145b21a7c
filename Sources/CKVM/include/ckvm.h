#pragma once
#include <linux/kvm.h>
