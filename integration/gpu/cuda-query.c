/* Asks the CUDA driver for its devices the way the CUDA runtime does: dlopen of
 * libcuda.so.1 by name, so the dynamic loader's search (ld.so.cache, LD_LIBRARY_PATH)
 * decides which file is used. Prints that file, the driver version and the device count.
 * Exit status 2 when the library cannot be found or lacks the calls. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>

int main(void)
{
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    struct link_map *map = NULL;
    int (*init)(unsigned int), (*version)(int *), (*count)(int *);
    int v = 0, n = 0;

    if (!cuda) {
        printf("libcuda: not found (%s)\n", dlerror());
        return 2;
    }
    init = (int (*)(unsigned int))dlsym(cuda, "cuInit");
    version = (int (*)(int *))dlsym(cuda, "cuDriverGetVersion");
    count = (int (*)(int *))dlsym(cuda, "cuDeviceGetCount");
    if (!init || !version || !count) {
        printf("libcuda: missing driver calls\n");
        return 2;
    }
    dlinfo(cuda, RTLD_DI_LINKMAP, &map);
    printf("libcuda: %s\n", map ? map->l_name : "?");
    if (init(0) != 0 || version(&v) != 0 || count(&n) != 0) {
        printf("libcuda: driver calls failed\n");
        return 1;
    }
    printf("driver version: %d\n", v);
    printf("devices: %d\n", n);
    return 0;
}
